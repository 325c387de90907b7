"""The testbed's PV guest image: its payload, /init and builder."""
