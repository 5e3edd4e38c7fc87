"""Layer 0, the vocabulary: frozen values, exceptions, triggers, validators, audit event
kinds, and the Plane/PlaneHost contracts. Imports nothing above it.
"""
