"""Evaluation of students and teachers: features extracted once, k-NN, linear probe, transfer, report."""
