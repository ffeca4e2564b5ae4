"""Run, job and corpus records in Redis, the settings and the file storage, shared by every process."""
