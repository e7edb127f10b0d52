"""Offline mixing behind `moray mix`: MPO max-min weights and Personalized Soups merged to disk."""
