"""Generated from proto/ by `python proto/generate.py`. Do not edit."""
