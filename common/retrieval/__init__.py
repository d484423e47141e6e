"""Retrieval on feature arrays: faiss kNN search, k-reciprocal encoding and Jaccard distance, re-ranking, evaluation."""
