"""Using a finished run: answer prompts (mode generate), serve it (Pod mode), and say how to deploy it."""
