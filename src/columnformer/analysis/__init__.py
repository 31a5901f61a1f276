"""What did the sheet learn: connectivity and topography metrics computed by streaming over data."""
