"""The data: datasets read from files or the Hub and split (sources), and conversations rendered with the chat
template and tokenized exactly as the server will (encoding).
"""
