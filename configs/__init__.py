"""YAML presets that override the typed schemas; shipped as package data so an installed wheel finds them."""
