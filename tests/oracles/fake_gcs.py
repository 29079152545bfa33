"""The fake GCS bucket of the experiments' tests (fake-gcs-server; the `fake_gcs` fixture of tests/experiments)."""

#: The bucket the `fake_gcs` fixture creates.
BUCKET = "bkt"
