"""The store on disk: its paths, the walk of a layer's paths into tar entries, its database.

Next to come here: the closure of store items and their layering.
"""
