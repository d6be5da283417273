"""Drop-in paths from models people run to an emitted runtime module.

* :mod:`.infinity` - FoundationVision/Infinity: ``apply(model, modules)`` patches a loaded model in place.
"""
