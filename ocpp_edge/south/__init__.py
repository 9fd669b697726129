"""south"""
