"""Embedded run specs; bbc_news.yaml is what `tailor run` does with no config."""
