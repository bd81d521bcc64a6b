"""The XFCC parser, against Envoy's documented examples and every way a header can be malformed."""

from __future__ import annotations

import pytest

from synctoken_server.authn.xfcc import XfccError, nearest_uri, parse

BFF = "spiffe://example.org/ns/web/sa/bff"
MESH = "spiffe://example.org/ns/mesh/sa/proxy"


class TestParse:
    """Well-formed headers."""

    @pytest.mark.parametrize(
        ("header", "elements"),
        [
            # Envoy's documentation examples.
            (
                "By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;URI=http://testclient.lyft.com",
                (
                    (
                        ("BY", "http://frontend.lyft.com"),
                        ("HASH", "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"),
                        ("URI", "http://testclient.lyft.com"),
                    ),
                ),
            ),
            (
                'By=http://frontend.lyft.com;Hash=468ed;Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com',
                (
                    (
                        ("BY", "http://frontend.lyft.com"),
                        ("HASH", "468ed"),
                        ("SUBJECT", "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"),
                        ("URI", "http://testclient.lyft.com"),
                    ),
                ),
            ),
            (
                f"By={MESH};URI=spiffe://a/x,By={BFF};URI={MESH}",
                ((("BY", MESH), ("URI", "spiffe://a/x")), (("BY", BFF), ("URI", MESH))),
            ),
            ('Subject="a,b;c=d";URI=x', ((("SUBJECT", "a,b;c=d"), ("URI", "x")),)),
            ('Subject="say \\"hi\\" \\\\ bye"', ((("SUBJECT", 'say "hi" \\ bye'),),)),
            ('Subject=""', ((("SUBJECT", ""),),)),
            ("uri=x", ((("URI", "x"),),)),
            ("Hash=", ((("HASH", ""),),)),
        ],
    )
    def test_elements(self, header: str, elements: object) -> None:
        """Elements by commas, pairs by semicolons, quoted values unescaped, keys upper-cased."""
        assert parse(header) == elements

    def test_nearest_is_last(self) -> None:
        """The URI taken is the last element's: the nearest proxy added it."""
        assert nearest_uri(f"By=x;URI=spiffe://evil.example/a,By=y;URI={BFF}") == BFF


class TestMalformed:
    """Every malformed header is refused, with the offset and never the header's text."""

    @pytest.mark.parametrize(
        ("header", "message"),
        [
            ('By=x;Subject="unterminated;URI=spiffe://a/b', "an unterminated quote from offset 13"),
            ('Subject="x\\', "an unterminated quote from offset 8"),
            ('Subject="x"y;URI=a', "text after a closing quote at offset 11"),
            ('Subject=x"y";URI=a', "a quote inside an unquoted value at offset 9"),
            ("URI", "a pair without '=' at offset 0"),
            ("", "a pair without '=' at offset 0"),
            ("URI=a;", "ends with ';': an empty pair or element"),
            ("URI=a,", "ends with ',': an empty pair or element"),
            ("URI=a,,URI=b", "a key that is not letters at offset 6"),
            (" URI=a", "a key that is not letters at offset 0"),
            ("=a", "a key that is not letters at offset 0"),
        ],
    )
    def test_refused(self, header: str, message: str) -> None:
        """The parser says what is wrong and where."""
        with pytest.raises(XfccError) as caught:
            parse(header)
        assert str(caught.value) == message

    @pytest.mark.parametrize(
        ("header", "count"),
        [
            ("By=x;Hash=y", 0),
            (f"URI={BFF};URI={MESH}", 2),
            (f"By=x;URI={BFF},By=y;Hash=z", 0),
            (f"By=x;URI={BFF};uri={MESH}", 2),
        ],
    )
    def test_not_one_uri(self, header: str, count: int) -> None:
        """No URI, or two in the nearest element (in any case), is refused rather than guessed at."""
        with pytest.raises(XfccError) as caught:
            nearest_uri(header)
        assert str(caught.value) == f"the nearest proxy's element has {count} URI values, not one"
