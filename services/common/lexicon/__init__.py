"""The sensitive-word lexicon of moderation and the llm worker: model, matching, stream filter, wire form."""
