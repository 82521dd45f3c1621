"""Helpers shared by the test modules (one copy each): image folders, run.py processes."""
