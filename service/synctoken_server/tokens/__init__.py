"""What gets signed: Twilio Access Tokens, the API keys that sign them, and what each key has signed."""
