"""Images made for people to review a round (logged to MLflow), rendered with Pillow to PNG bytes."""
