"""Command-line tools: ``lifelong run | demo | evaluate | generate | kb``, stream generators and the embedded
broker of the demo and the tests."""
