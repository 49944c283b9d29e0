"""The model: its shape read from config.json or a shipped architecture file (architecture), the 4-bit or
16-bit load (loading), and the built-in tiny models made locally (tiny).
"""
