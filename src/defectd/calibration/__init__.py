"""Decision thresholds from data, INT8 quantisation, camera geometry and flat-field."""
