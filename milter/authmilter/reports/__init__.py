"""DMARC aggregate reports (RFC 9990): store, aggregation, XML, delivery."""
