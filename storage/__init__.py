"""Data at rest: keys and LSNs, values and redo, layer files, manifests, the layer map, the object
store client, the read path and timeline import/export."""
