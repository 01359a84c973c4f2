"""Other tools' formats and services: export files, the Hugging Face Hub, ART, experiment trackers."""
