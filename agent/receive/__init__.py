"""The DICOM receiver: a pynetdicom SCP that writes what it is sent to the spool, undecoded."""
