"""Compression beyond slicing: closed-form corrections of a sliced Shape's weights."""
