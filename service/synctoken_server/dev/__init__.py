"""`synctoken dev`: a throwaway CA, certificates, credentials and config for trying synctoken; never production."""
