"""Core: ids, errors, config. Imports nothing else of ekmesh."""
