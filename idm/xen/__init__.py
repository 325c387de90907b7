"""Small wrappers over the Xen interfaces a channel needs: grant pages (gntalloc, gntdev), event
channels (evtchn) and xenstore. Each opens its own device, raises errors that name the device and
the errno, and knows nothing about rings."""
