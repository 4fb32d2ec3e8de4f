"""The SQLite result store: schema migrations, results, and the claims that let several runners share
one store.
"""
