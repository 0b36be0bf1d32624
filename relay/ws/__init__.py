"""WebSocket server shell over wsproto, for trio."""
