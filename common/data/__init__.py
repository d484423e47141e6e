"""Datasets: readers for the re-ID dataset layouts and LUPerson, and image decoding."""
