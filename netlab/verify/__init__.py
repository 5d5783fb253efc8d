"""Looking at the datapath from the outside: packet captures inside lab namespaces.

``sniff`` is the capture engine that ``netlab trace``/``netlab capture`` build on. Import the
submodule explicitly (``from netlab.verify.sniff import Capture``) so that importing the package
stays free of scapy.
"""
