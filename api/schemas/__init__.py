"""Request and response schemas, one family per resource: ``XCreate`` in, ``XPublic`` and ``XsPublic`` out."""
