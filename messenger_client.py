"""Messenger client: the command line for messenger_server.py (work in progress)."""
