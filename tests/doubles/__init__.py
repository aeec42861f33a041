"""Test doubles: only small fault injectors remain (see README.md), where they are used."""
