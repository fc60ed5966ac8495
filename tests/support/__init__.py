"""Test infrastructure: real peers (Orthanc, DCMTK), generated data, validators."""
