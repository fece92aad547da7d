"""DICOM receive: the Storage SCP (C-ECHO, C-STORE), allow-list, TLS, durable writes."""
