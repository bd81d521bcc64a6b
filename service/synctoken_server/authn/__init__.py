"""Who is calling: the caller's verified certificate, or in mesh mode the sidecar's XFCC header; never the request."""
