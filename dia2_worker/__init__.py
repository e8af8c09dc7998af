"""Serverless RunPod worker serving Nari Labs Dia2 streaming dialogue text-to-speech."""
