"""After training: the chat engine (one loaded model + template + stop ids), terminal chat, eval and the agent."""
