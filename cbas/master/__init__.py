"""The master daemon: message endpoint, JSON API, and the managers behind them."""
