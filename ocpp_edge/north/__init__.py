"""north"""
