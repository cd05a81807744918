"""What the tests share: stores, crafted archives, real tools. Test modules import
only from here (and conftest.py holds the fixtures)."""
