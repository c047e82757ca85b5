"""Sharing a trained model: the model card, the Hugging Face Hub, and what the main process writes at the end.

    model_card.py  ``training_run.json`` and the model card (README.md)
    hub.py         Hub pushes during and after training
    sharing.py     the end of a run: files, card, push, wandb
"""
