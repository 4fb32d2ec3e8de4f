"""Core types every stage shares: the error hierarchy, result records, the plugin registry, atomic file
writes, progress bars and optional-extra checks. Imports nothing of ours.
"""
