"""CamVid data: class table and label encoding, label cache, file layout, dataset check, download."""
