"""Stages as DataFrame -> DataFrame transforms, plus config, session, readers and writers."""
