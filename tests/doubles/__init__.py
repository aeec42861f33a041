"""TEST DOUBLES of kind and of the kind node image, and their tests."""
