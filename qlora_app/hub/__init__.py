"""The Hugging Face Hub: downloads and their errors in one line (access), and the model card (card).
"""
