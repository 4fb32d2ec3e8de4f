"""Model zoos to merge: the toy model and tasks, the toy and SmolLM2 zoos, and the offline demo."""
