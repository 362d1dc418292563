"""Figures and reports from run folders (matplotlib, written as PNG)."""
