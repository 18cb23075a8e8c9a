"""Liandong agency plugins (ecology, police, procuratorate)."""
